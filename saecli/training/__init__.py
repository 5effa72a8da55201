"""Training: one loop (`fit`) for any dictionary and any number of members on one stream.

    from saecli.training import train            # a whole experiment → its run folder
    from saecli.training import Member, fit      # the loop itself (the sweep drives many members)
"""

from saecli.training.member import Member
from saecli.training.run import train
from saecli.training.schedules import Schedule
from saecli.training.trainer import NullReporter, Reporter, fit, initialize, plan_steps

__all__ = ["Member", "NullReporter", "Reporter", "Schedule", "fit", "initialize", "plan_steps", "train"]
