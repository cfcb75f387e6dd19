"""`benchmarks/kernel_fingerprint`: what of a PTX counts as the GPU's code."""

from vllm_longspec_benchmarks.kernel_fingerprint import instructions

PTX = """.version 8.7
.target sm_90a
.visible .entry k(
.param .u64 k_param_0
)
{
\t.loc\t1 42 0
$L__tmp0:
\tld.global.b32 \t%r1, [%rd1];
$L__BB0_2:
\tbra.uni \t$L__BB0_2;
\tret;
}
\t.section\t.debug_abbrev
\t{
.b8 1 // DW_CHILDREN_yes
\t}
"""


def test_debug_info_and_its_labels_are_left_out():
    code = instructions(PTX)
    assert ".loc" not in code and "$L__tmp0" not in code and "DW_" not in code
    assert "ld.global.b32 \t%r1, [%rd1];" in code
    assert "$L__BB0_2:" in code  # branch targets are code


def test_a_changed_instruction_changes_the_code():
    assert instructions(PTX) != instructions(PTX.replace("ld.global.b32", "ld.global.b16"))
    assert instructions(PTX) == instructions(PTX.replace("\t.loc\t1 42 0", "\t.loc\t1 43 7"))
