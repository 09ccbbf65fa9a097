# The two halves every cross-check script here shares with src/verify/sweep.rs: inputs drawn from a
# 64-bit LCG both sides reproduce, outputs compared by FNV-1a 64.
M = (1 << 64) - 1


def lcg_bytes(n, seed):
    x, out = seed & M, bytearray(n)
    for i in range(n):
        x = (x * 6364136223846793005 + 1442695040888963407) & M
        out[i] = (x >> 33) & 0xFF
    return bytes(out)


def fnv1a(b):
    h = 0xcbf29ce484222325
    for v in b:
        h = ((h ^ v) * 0x100000001b3) & M
    return h
