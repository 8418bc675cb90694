"""Offline jobs that need no Ray and no Kafka: pretraining on a log, sequence and replay evaluation."""
