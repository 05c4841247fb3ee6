"""Model definitions: decoder architectures, TP layers, MoE experts, fused kernels, weight loading."""
