"""Method adapters: one file per method, each paired with ``conf/method/<name>.yaml``."""
