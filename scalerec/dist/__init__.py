"""torch.distributed helpers shared by the row-sharded table (``models``) and the sharded losses (``losses``).

The lowest layer above ``ops``: it imports nothing from scalerec. Every helper treats ``group=None`` with no
initialised process group as the single-process case, so one code path serves W = 1 and W workers."""
