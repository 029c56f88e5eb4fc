"""What crosses the wire between coordinator and workers: JSON messages and safetensors bodies."""
