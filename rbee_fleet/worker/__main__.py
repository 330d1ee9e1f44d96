from rbee_fleet.worker.main import main

main()
