"""Linear and recurrent attention: mechanisms built on the chunked-scan core `attn.functional.linear_attention`."""
