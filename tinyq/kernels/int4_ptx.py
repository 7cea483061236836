"""PTX shared by the fp16 int4 kernels: 8 nibbles of one int32 word -> 4 fp16 pairs of ``q - z``.

``lop3 (w >> 4j) & 0x000F000F | 0x64006400`` builds the fp16 pair (1024 + q_j, 1024 + q_j+4) in
one instruction (fp16 1024.0 is 0x6400 and its last mantissa bit weighs 1); subtracting the pair
(1024 + z, 1024 + z) leaves ``q - z`` exactly. After these lines registers q0..q3 hold the pairs
(nibble j, nibble j + 4) for j = 0..3.
"""


def nibble_pairs_minus_zero(word: str, zero_pair: str) -> str:
    """PTX lines unpacking ``word`` (a .b32 operand) into q0..q3 = (q - z) pairs, given
    ``zero_pair`` (a .b32 register holding (1024 + z, 1024 + z))."""
    lines = [f"shr.u32 t{j}, {word}, {4 * j};" for j in (1, 2, 3)]
    srcs = [word, "t1", "t2", "t3"]
    lines += [f"lop3.b32 q{j}, {srcs[j]}, 0x000F000F, 0x64006400, 0xEA;" for j in range(4)]
    lines += [f"sub.f16x2 q{j}, q{j}, {zero_pair};" for j in range(4)]
    return "\n".join(lines)
