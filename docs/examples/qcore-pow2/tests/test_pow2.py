from qcore.testing import MethodConformance


class TestPow2(MethodConformance):
    method = "pow2"
    plugin_module = "qcore_pow2.plugin"
    tiny_options = {"bits": 4, "group_size": 32}
    unsupported = [({"bits": 4, "group_size": 48}, "group_size 48"), ({"max_shift": 9}, "max_shift")]
    max_error_vs_rtn = 2.0  # power-of-two scales are coarser than RTN's
