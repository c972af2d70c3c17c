"""Built-in methods (registered through the ``qcore`` entry-point group like any plugin)."""
