"""kdcore: knowledge distillation for breast-ultrasound classification."""
