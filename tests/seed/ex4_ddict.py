import dragon_nb
import multiprocessing as mp
from multiprocessing import set_start_method, Pool, cpu_count, current_process
from pathlib import Path

from dragon_nb.data.ddict import DDict
from dragon_nb.native.machine import System, Node


def initialize_worker(the_ddict):
    # Since we want each worker to maintain a persistent handle to the DDict,
    # attach it to the current/local process instance. Done this way, workers attach only
    # once and can reuse it between processing work items
    me = current_process()
    me.stash = {}
    me.stash["ddict"] = the_ddict


def process_data(filename):
    the_ddict = current_process().stash["ddict"]
    try:
        with open(filename, mode='r') as f:
            fdata = f.read()

        # perform some operations on fdata and place into variable called result
        result = len(fdata)  # seed fix: `result` was never defined
        the_ddict[filename] = result
        return True
    except:
        return False


def setup_ddict():

    # let's place the DDict across all nodes Dragon is running on
    my_system = System()
    num_nodes = my_system.nnodes

    total_mem = 0
    for huid in my_system.nodes:
        anode = Node(huid)
        total_mem += anode.physical_mem
    dict_mem = 0.1 * total_mem  # use 10% of the mem

    return DDict(
        2,  # two managers per node
        num_nodes,
        int(dict_mem),
        )


if __name__ == '__main__':
    set_start_method("dragon")

    dir_to_process = "."

    num_cores = cpu_count() // 2  # all cores across all nodes, but let's not count hyperthreads

    files_to_process = [str(f.resolve()) for f in Path(dir_to_process).glob('*')]

    the_ddict = setup_ddict()

    # use the standard initializer argument to Pool to pass the DDict to each worker
    with Pool(num_cores, initializer=initialize_worker, initargs=(the_ddict,)) as p:
        files_were_processed = p.map(process_data, files_to_process)

    # peek at data from one file
    print(the_ddict[files_to_process[2]], flush=True)

    print(f"processed={sum(files_were_processed)} stored={len(the_ddict)} "  # added for the test
          f"total={sum(the_ddict.values())} managers={len(the_ddict.stats)}",  # added for the test
          flush=True)  # added for the test
