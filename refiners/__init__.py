"""difftori.refiners: DiffTORI, residual and IBC refiners (walking skeleton 3/4)."""
