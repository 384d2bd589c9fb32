"""Exact backprop through long sequences in bounded memory: Revolve schedules, storage tiers
(device, host, disk) with asynchronous writes and prefetch, and checkpointed scans."""
