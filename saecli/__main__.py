"""`python -m saecli` and `accelerate launch -m saecli` enter here (absolute imports only)."""

from saecli.cli import main

if __name__ == "__main__":
    main()
