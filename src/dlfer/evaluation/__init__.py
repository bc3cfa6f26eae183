"""What a trained model is worth: metrics with bootstrap intervals (metrics), the leak of train faces into
test (leak), the report beside the paper (compare), the model card (model_card), the metric-regression
gate (gate), committed results and their report (results), the end-of-run
summary (summary), offline plots (plots) and the experiments listing (experiments)."""
