"""Model pieces shared by the objectives: the backbone adapter, patches, masks, heads, teachers,
tokenizers, momentum encoders, losses and pictures. Each module is named for what it holds."""
