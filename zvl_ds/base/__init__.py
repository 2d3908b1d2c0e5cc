"""The ground floor, which every room may use and which uses no other: user errors and the exit path of the entry
points (``errors``, ``cli``), atomic writes and checksums, the paths of packaged files, and the torchvision shim
for CPU-only torch. Nothing here imports torch's heavy libraries, DeepSpeed or another room of zvl_ds."""
