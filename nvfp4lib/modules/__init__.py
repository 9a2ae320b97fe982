"""nn.Modules over the nvfp4lib ops: attention projections, the shared expert."""
