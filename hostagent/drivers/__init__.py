"""Hypervisor drivers, one module each, registered in ``hostagent.driver.DRIVERS``."""
