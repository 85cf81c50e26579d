"""DIET distillation: the synthetic memory, phase 1 (boundary memory), phase 2 (bi-level
refinement with influence-guided addressing and RaT-BPTT) and the stage driver."""
