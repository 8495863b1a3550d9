"""Native kernel sources (C++/CUDA) and their build helpers."""
