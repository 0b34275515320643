"""difftori.eval: simulator envs, scripted experts, rollouts and demo generation."""
