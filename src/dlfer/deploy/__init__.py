"""Using a trained model: face detection and crops (faces), predictions on images and videos (predict),
TFLite / ONNX / SavedModel export with parity checks (export) and the HTTP server with its web page
(serving, serving_page)."""
