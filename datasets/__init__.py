"""difftori.datasets: the zarr episode store and point-cloud math. Imports no simulator or model."""
