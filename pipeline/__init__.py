"""difftori.pipeline: the `difftori` command line (one subcommand per DVC stage)."""
