"""An example lossd plugin: ``charbonnier`` and ``knowledge_distillation``.

Importing :mod:`lossd_example_plugin.losses` registers both with the server; the
``lossd.losses`` entry point makes ``lossd serve`` do that by itself.
"""

__version__ = "0.1.0"
