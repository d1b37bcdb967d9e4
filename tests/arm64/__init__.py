"""Tests of the device runtime on emulated arm64: qemu-user roots per board CPU, and a full systemd VM."""
