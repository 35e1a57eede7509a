"""Tools behind the CLI's inspection commands: bench, info, memory (training-memory estimate), plot."""
