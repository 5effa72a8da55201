"""Feature analysis (`saecli analyze`) and direct logit attribution (`saecli dla`).

from saecli.analysis import FeatureAnalyzer, AnalysisResult, dla_result
"""

from saecli.analysis.analyzer import FeatureAnalyzer, context_batches, publish, run_analysis
from saecli.analysis.dla import DLAResult, direct_logit_attribution, dla_result, feature_directions
from saecli.analysis.records import AnalysisResult, analysis_dir
from saecli.analysis.topk import FeatureBook

__all__ = [
    "AnalysisResult",
    "DLAResult",
    "FeatureAnalyzer",
    "FeatureBook",
    "analysis_dir",
    "context_batches",
    "direct_logit_attribution",
    "dla_result",
    "feature_directions",
    "publish",
    "run_analysis",
]
