"""VMM backends of the attach workflow (``vmdriver.attachments``), one module each, chosen by
the ``--connect`` URI's scheme (``vmdriver.backends.registry``)."""
