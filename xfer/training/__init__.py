"""One run: set up, compile, train, evaluate, checkpoint and report, in one workdir."""
