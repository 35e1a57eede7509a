"""Stop strings for streamed text: moved to the core (`minigpt.stop_strings`) so the batcher can end a
row at a stop string; this name stays so code that imported it from the server keeps working."""

from ..stop_strings import StopMatcher

__all__ = ["StopMatcher"]
