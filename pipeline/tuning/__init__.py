"""The optional stage: fine-tuning the backbone with a new head, or training it from scratch."""
