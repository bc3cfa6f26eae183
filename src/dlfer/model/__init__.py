"""The networks and how they learn: EfficientNet backbones and the EF-FER classifier (backbones), the
offline EfficientNet-Lite0 with its ImageNet weights (lite0, read by torch_legacy), the training loop,
schedules, augmentation and resumable progress (train), faster kernels for Keras layers training on a CPU
(cpu_kernels), multi-device training (distributed), the per-class logit bias fitted on validation
macro-F1 after training (class_bias), and a model that averages each face with its mirror (mirror)."""
