//! Models from Hugging Face (being written).
