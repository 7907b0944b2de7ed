"""The torch-free CPU runtime: what `llm run` (LLM.load) runs for plain decoding of a model whose
blocks are all native whole-block calls (core/archs.NATIVE), with numpy buffers and without
importing torch (~220 MB of RSS and over a second of start-up). load.py decides and loads,
model.py is the forward pass, kv.py the KV cache. The logits are the torch path's bits.
"""
