"""Tests of keystate's reader of Apache Flink ``_metadata`` files (``keystate.storage.format.flink``)."""
