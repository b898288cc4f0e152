"""Cross-modal attention mechanisms: video, vision-language and recommendation systems that attend across modalities
or sequences (input kind "cross": x [batch, length, embed] attends to context [batch, context_length, embed])."""
