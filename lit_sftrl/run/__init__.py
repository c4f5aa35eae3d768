"""Run plumbing on top of Lightning: checkpoints, run directories, loggers, progress, the quiet console,
one-line errors."""
