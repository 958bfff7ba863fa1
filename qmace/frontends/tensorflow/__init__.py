"""TensorFlow frontend: frozen GraphDef ``.pb`` files (``platform: tensorflow``), read without TensorFlow.

``load_tensorflow`` converts (see ``convert``); ``tf_oracle`` runs the original graph in TensorFlow for
``run --validate`` when TensorFlow is installed (``pip install qmace[tf]``), else returns None.
"""

from qmace.frontends.tensorflow.convert import graphdef_to_graph, load_tensorflow, read_graphdef
from qmace.frontends.tensorflow.ops import supported_tf_ops
from qmace.frontends.tensorflow.oracle import INSTALL_HINT, tf_oracle

__all__ = ["INSTALL_HINT", "graphdef_to_graph", "load_tensorflow", "read_graphdef", "supported_tf_ops", "tf_oracle"]
