"""The network (ModelConfig, EquiforceModel), forces/virial by autograd, and the analytic test model."""
