"""difftori.base_policies: base policies behind one contract and a registry (walking skeleton 2/4)."""
