"""Running a pruned model from its compact form: sparse linear modules and their native kernels."""
