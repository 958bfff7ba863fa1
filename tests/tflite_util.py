"""Writing tiny ``.tflite`` files in tests with the ``tflite`` package's flatbuffer builders (TensorFlow cannot
write unknown custom ops, and the suite must not need it)."""

from __future__ import annotations

import flatbuffers
import tflite


def fb_ints(b: flatbuffers.Builder, start, values: list[int]) -> int:
    """An int32 vector (``start`` is the table's ``...StartXVector``); returns its offset."""
    start(b, len(values))
    for v in reversed(values):
        b.PrependInt32(v)
    return b.EndVector()


def fb_offsets(b: flatbuffers.Builder, start, items: list[int]) -> int:
    """A vector of table offsets; returns its offset."""
    start(b, len(items))
    for it in reversed(items):
        b.PrependUOffsetTRelative(it)
    return b.EndVector()


def finish_model(b: flatbuffers.Builder, codes: list[int], tensors: list[int], operators: list[int],
                 inputs: list[int], outputs: list[int]) -> bytes:
    """One subgraph of ``tensors`` / ``operators`` with graph ``inputs`` / ``outputs`` (tensor indices), one
    empty buffer, schema version 3; the finished file's bytes."""
    t_vec = fb_offsets(b, tflite.SubGraphStartTensorsVector, tensors)
    o_vec = fb_offsets(b, tflite.SubGraphStartOperatorsVector, operators)
    i_vec, out_vec = fb_ints(b, tflite.SubGraphStartInputsVector, inputs), fb_ints(b, tflite.SubGraphStartOutputsVector, outputs)
    tflite.SubGraphStart(b)
    tflite.SubGraphAddTensors(b, t_vec)
    tflite.SubGraphAddOperators(b, o_vec)
    tflite.SubGraphAddInputs(b, i_vec)
    tflite.SubGraphAddOutputs(b, out_vec)
    sg = tflite.SubGraphEnd(b)
    tflite.BufferStart(b)
    buf = tflite.BufferEnd(b)
    codes_vec = fb_offsets(b, tflite.ModelStartOperatorCodesVector, codes)
    sg_vec = fb_offsets(b, tflite.ModelStartSubgraphsVector, [sg])
    buf_vec = fb_offsets(b, tflite.ModelStartBuffersVector, [buf])
    tflite.ModelStart(b)
    tflite.ModelAddVersion(b, 3)
    tflite.ModelAddOperatorCodes(b, codes_vec)
    tflite.ModelAddSubgraphs(b, sg_vec)
    tflite.ModelAddBuffers(b, buf_vec)
    b.Finish(tflite.ModelEnd(b), file_identifier=b"TFL3")
    return bytes(b.Output())
