from matrixoe_cli.main import run

run()
