"""`Pool`: Python's `multiprocessing.Pool` on the cluster, as Ray's
`ray.util.multiprocessing.Pool`: its processes are actors, so a program written for
`multiprocessing` spreads its work over every node by changing one import.
"""

from ionet.util.multiprocessing.pool import AsyncResult, Pool, TimeoutError

__all__ = ["AsyncResult", "Pool", "TimeoutError"]
