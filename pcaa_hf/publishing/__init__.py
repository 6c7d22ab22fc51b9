"""Our model out to its users: model cards, export folders and Hub uploads, and exports for deployment (torch.export,
ONNX, OpenVINO)."""
