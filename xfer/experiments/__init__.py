"""Many runs: ablation grids and the tables that compare them."""
