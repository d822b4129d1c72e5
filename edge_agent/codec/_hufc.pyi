# buffers: anything with the buffer protocol (bytes, memoryview, numpy arrays)
from typing import Any

def decode(stream: Any, starts: Any, ends: Any, per: int, table: Any, out: Any, /) -> int: ...
