"""Python in the sandbox's warm interpreter: `run_code` and its contexts (separate notebooks)."""

from __future__ import annotations

from fastapi import APIRouter, Response

from tartarus.daemon.models import (
    CodeContextList,
    CodeContextModel,
    CodeError,
    CodeResult,
    NewCodeContext,
    RunCodeRequest,
    RunCodeResult,
)
from tartarus.daemon.routes.deps import ERRORS, Manager
from tartarus.wire import CodeContext, Execution

router = APIRouter()
CONTEXTS = "/v1/sandboxes/{sandbox_id}/code/contexts"


def run_code_result(execution: Execution) -> RunCodeResult:
    error = execution.error
    return RunCodeResult(
        stdout=execution.stdout,
        stderr=execution.stderr,
        result=execution.result,
        error=None
        if error is None
        else CodeError(name=error.name, value=error.value, traceback=error.traceback),
        results=[
            CodeResult(
                text=r.text,
                html=r.html,
                markdown=r.markdown,
                svg=r.svg,
                png=r.png,
                jpeg=r.jpeg,
                pdf=r.pdf,
                latex=r.latex,
                json_=r.json,
                javascript=r.javascript,
                is_main_result=r.is_main_result,
            )
            for r in execution.results
        ],
        execution_count=execution.execution_count,
    )


def _context(context: CodeContext) -> CodeContextModel:
    return CodeContextModel(id=context.id, language=context.language, cwd=context.cwd)


@router.post("/v1/sandboxes/{sandbox_id}/code", response_model=RunCodeResult, responses=ERRORS)
async def run_code(sandbox_id: str, body: RunCodeRequest, manager: Manager) -> RunCodeResult:
    """Run Python in the sandbox's warm interpreter; globals persist between calls. The last
    expression's value and any figure shown come back in `results`, in their rich formats."""
    async with manager.use(sandbox_id) as rt:
        interpreter = await rt.code_interpreter()
        execution = await interpreter.run_code(body.code, body.timeout, context=body.context, env=body.env)
    return run_code_result(execution)


@router.post(CONTEXTS, response_model=CodeContextModel, status_code=201, responses=ERRORS)
async def create_context(sandbox_id: str, body: NewCodeContext, manager: Manager) -> CodeContextModel:
    """A new notebook in the interpreter: its own globals and working directory."""
    async with manager.use(sandbox_id) as rt:
        return _context(await (await rt.code_interpreter()).create_context(body.cwd))


@router.get(CONTEXTS, response_model=CodeContextList, responses=ERRORS)
async def list_contexts(sandbox_id: str, manager: Manager) -> CodeContextList:
    async with manager.use(sandbox_id) as rt:
        contexts = await (await rt.code_interpreter()).contexts()
    return CodeContextList(contexts=[_context(c) for c in contexts])


@router.post(CONTEXTS + "/{context_id}/restart", response_model=CodeContextModel, responses=ERRORS)
async def restart_context(sandbox_id: str, context_id: str, manager: Manager) -> CodeContextModel:
    """Forget the context's globals, as a restarted notebook kernel."""
    async with manager.use(sandbox_id) as rt:
        return _context(await (await rt.code_interpreter()).restart_context(context_id))


@router.delete(CONTEXTS + "/{context_id}", status_code=204, response_class=Response, responses=ERRORS)
async def delete_context(sandbox_id: str, context_id: str, manager: Manager) -> Response:
    async with manager.use(sandbox_id) as rt:
        await (await rt.code_interpreter()).delete_context(context_id)
    return Response(status_code=204)
