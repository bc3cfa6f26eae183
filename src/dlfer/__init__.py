"""dlfer: a reproducible DVC + MLflow pipeline that reproduces and audits DLFER on FER2013."""

import os

__version__ = "0.1.0"

# TensorFlow reads its C++ log level once, when it is first imported, and every stage and command
# imports dlfer before TensorFlow. Level 3 keeps only fatal lines: on a CPU machine TensorFlow
# otherwise prints "failed call to cuInit ... (303)" and, for graphs of newer versions, "NodeDef
# mentions attribute use_unbounded_threadpool", both at error level though nothing is wrong.
# Real failures still raise Python exceptions with their message; train.configure_runtime says
# which device trains. Set TF_CPP_MIN_LOG_LEVEL=0 to see everything.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
