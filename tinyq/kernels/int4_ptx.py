"""PTX shared by the int4 kernels: 8 nibbles of one int32 word -> 4 half-precision pairs of ``q - z``.

``lop3 (w >> 4j) & 0x000F000F | MAGIC`` builds the pair (M + q_j, M + q_j+4) in one instruction,
where M is a power of two whose last mantissa bit weighs 1: fp16 1024.0 (0x6400) or bf16 128.0
(0x4300). Subtracting the pair (M + z, M + z) leaves ``q - z`` exactly. Kind ``f16_div16`` uses fp16
64.0 (0x5400), whose last mantissa bit weighs 1/16: with the pair (64 + z/16, 64 + z/16) it leaves
``(q - z) / 16``, also exact, which keeps a product with x below |x| without scaling x. After these
lines registers q0..q3 hold the pairs (nibble j, nibble j + 4) for j = 0..3.

bf16 pair arithmetic uses ``fma.rn.bf16x2`` (sm_80+; ``sub``/``mul.bf16x2`` need sm_90):
``q - z = fma(zz, -1, q)`` and ``d * s = fma(d, s, -0.0)`` round exactly as sub/mul would. Its
operands must be registers: the constants live in ``nonebf`` / ``nzerobf``, which the caller's
asm declares and sets (:data:`BF16_CONSTANTS`).
"""

KINDS = ("f16", "bf16")
_MAGIC = {"f16": "0x64006400", "bf16": "0x43004300", "f16_div16": "0x54005400"}
BF16_CONSTANTS = ".reg .b32 nonebf, nzerobf;\nmov.b32 nonebf, 0xBF80BF80;\nmov.b32 nzerobf, 0x80008000;\n"


def nibble_pairs_minus_zero(word: str, zero_pair: str, kind: str = "f16") -> str:
    """PTX lines unpacking ``word`` (a .b32 operand) into q0..q3 = (q - z) pairs, given
    ``zero_pair`` (a .b32 register holding (M + z, M + z)); needs .b32 registers t1..t3, q0..q3."""
    lines = [f"shr.u32 t{j}, {word}, {4 * j};" for j in (1, 2, 3)]
    srcs = [word, "t1", "t2", "t3"]
    lines += [f"lop3.b32 q{j}, {srcs[j]}, 0x000F000F, {_MAGIC[kind]}, 0xEA;" for j in range(4)]
    if kind != "bf16":
        lines += [f"sub.f16x2 q{j}, q{j}, {zero_pair};" for j in range(4)]
    else:
        lines += [f"fma.rn.bf16x2 q{j}, {zero_pair}, nonebf, q{j};" for j in range(4)]
    return "\n".join(lines)


def dequant8(kind: str) -> str:
    """Inline asm ``$8`` (word), ``$9`` (M + z), ``$10`` (s) -> ``$0..$7`` = (q_i - z) * s for
    nibbles i = 0..7, in fp16 (``kind="f16"``) or bf16. One rounding (the multiply), as in the
    plain path; about 2 instructions per weight instead of shift, mask, convert, subtract, multiply."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if kind == "f16":
        scale = [f"mul.rn.f16x2 q{j}, q{j}, ss;" for j in range(4)]
    else:
        scale = [f"fma.rn.bf16x2 q{j}, q{j}, ss, nzerobf;" for j in range(4)]
    return (
        "{\n.reg .b32 t1, t2, t3, q0, q1, q2, q3, zz, ss;\n" + (BF16_CONSTANTS if kind == "bf16" else "")
        + "mov.b32 zz, {$9, $9};\nmov.b32 ss, {$10, $10};\n"
        + nibble_pairs_minus_zero("$8", "zz", kind) + "\n" + "\n".join(scale)
        + "\nmov.b32 {$0, $4}, q0;\nmov.b32 {$1, $5}, q1;\nmov.b32 {$2, $6}, q2;\nmov.b32 {$3, $7}, q3;\n}"
    )
